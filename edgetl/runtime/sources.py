"""Frame sources: image files, video files, a live camera (OpenCV/V4L2 or Picamera2).

A live camera is read in its own thread that keeps only the newest frame, so a slow model never falls
behind the camera: it always classifies the latest picture and older ones are dropped (and counted).
Video files are read frame by frame in order: a file is not live, and every frame is classified.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .preprocess import decode_bgr_frame, load_image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class SourceError(Exception):
    """A source cannot be opened or stopped delivering frames."""


@dataclass
class Frame:
    rgb: np.ndarray | None  # None: this item could not be read (counted as skipped)
    name: str  # file name, or "<kind>:<index>"
    index: int
    error: str = ""


def image_frames(paths: list[str]) -> Iterator[Frame]:
    """Image files and folders (recursively, sorted); unreadable files come back with ``rgb=None``."""
    index = 0
    for source in paths:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files = [path]
        for file in files:
            try:
                yield Frame(load_image(str(file)), str(file), index)
            except ValueError as exc:
                yield Frame(None, str(file), index, str(exc))
            index += 1


def _cv2():
    import cv2

    return cv2


def video_frames(path: str) -> Iterator[Frame]:
    """Every frame of a video file, in order."""
    cv2 = _cv2()
    if not Path(path).is_file():
        raise SourceError(f"video file {path} does not exist")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SourceError(f"cannot open video {path} (unsupported format or codec?)")
    try:
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield Frame(decode_bgr_frame(frame), f"{Path(path).name}:{index}", index)
            index += 1
        if index == 0:
            raise SourceError(f"video {path} has no readable frames")
    finally:
        capture.release()


class LatestFrameReader:
    """Reads frames from ``read()`` in a background thread, keeping only the newest one.

    Args:
        read: returns ``(ok, bgr_frame)`` like ``cv2.VideoCapture.read``.
        name: for messages.
        failure_timeout: seconds of failed reads after which the camera counts as gone.
    """

    def __init__(self, read, name: str, failure_timeout: float = 2.0):
        self._read = read
        self.name = name
        self.failure_timeout = failure_timeout
        self._cond = threading.Condition()
        self._frame: np.ndarray | None = None
        self._sequence = 0
        self._error: str | None = None
        self._stopped = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"capture-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing_since = None
        while not self._stopped:
            try:
                ok, frame = self._read()
            except Exception as exc:  # a driver error is a lost camera, reported to the reader
                ok, frame = False, None
                failing_since = failing_since or time.monotonic() - self.failure_timeout
                reason = str(exc)
            else:
                reason = "no frames"
            if ok and frame is not None:
                failing_since = None
                with self._cond:
                    if self._frame is not None:
                        self.dropped += 1  # the model did not take the previous one: drop it
                    self._frame = frame
                    self._sequence += 1
                    self._cond.notify_all()
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since >= self.failure_timeout:
                with self._cond:
                    self._error = f"camera {self.name} stopped delivering frames ({reason}); unplugged?"
                    self._cond.notify_all()
                return
            time.sleep(0.01)

    def latest(self, timeout: float = 5.0) -> np.ndarray:
        """Wait for a frame newer than the last one returned, and take it.

        Raises:
            SourceError: the camera is gone, or no frame came within ``timeout``.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._frame is not None or self._error, timeout):
                raise SourceError(f"camera {self.name} delivered no frame within {timeout:.0f}s")
            if self._frame is None:
                raise SourceError(self._error or f"camera {self.name} failed")
            frame, self._frame = self._frame, None
            return frame

    def stop(self) -> None:
        self._stopped = True
        self._thread.join(timeout=2)


def camera_frames(index: int, width: int = 640, height: int = 480, max_frames: int | None = None,
                  picamera2: bool = False) -> tuple[Iterator[Frame], LatestFrameReader]:  # fmt: skip
    """Frames from a live camera (OpenCV's V4L2 backend, or Picamera2 when asked for)."""
    if picamera2:
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise SourceError("--picamera2 needs the picamera2 package (apt install python3-picamera2)") from None
        camera = Picamera2(index)
        camera.configure(camera.create_preview_configuration(main={"size": (width, height), "format": "BGR888"}))
        camera.start()

        def read():
            return True, camera.capture_array()

        release = camera.stop
    else:
        cv2 = _cv2()
        if hasattr(cv2, "setLogLevel"):  # OpenCV's own device warnings; the error below says it in one line
            previous = cv2.setLogLevel(0)
        capture = cv2.VideoCapture(index)
        if hasattr(cv2, "setLogLevel"):
            cv2.setLogLevel(previous)
        if not capture.isOpened():
            raise SourceError(f"no camera at index {index} (is it connected? try --camera 0, 1, ...)")
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        read, release = capture.read, capture.release
    reader = LatestFrameReader(read, str(index))

    def frames() -> Iterator[Frame]:
        try:
            count = 0
            while max_frames is None or count < max_frames:
                yield Frame(decode_bgr_frame(reader.latest()), f"camera{index}:{count}", count)
                count += 1
        finally:
            reader.stop()
            release()

    return frames(), reader
