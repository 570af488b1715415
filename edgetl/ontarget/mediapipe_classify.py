"""Run by an interpreter that has ``mediapipe`` (numpy 2: never edgetl's own environment); imports
nothing of edgetl.

    python mediapipe_classify.py MODEL CROP_FRACTION IMAGE...

Classifies each image with MediaPipe Tasks' ImageClassifier, given only the model file (the labels
come from its metadata), on the centred square region edgetl's preprocessing crops (CROP_FRACTION of
the shorter side; 0: no region, MediaPipe's default of stretching the whole frame). Prints one JSON
line per image: the top category's name, index and score, and every category's score by index; then
one ``{"device": ...}`` line with the MediaPipe and numpy versions.
"""

import json
import platform
import sys
from importlib import metadata

sys.path.pop(0)  # this script's folder (edgetl/ontarget) holds modules of edgetl's, not MediaPipe's

import mediapipe as mp  # noqa: E402
from mediapipe.tasks import python as tasks  # noqa: E402
from mediapipe.tasks.python import vision  # noqa: E402
from mediapipe.tasks.python.components.containers.rect import RectF  # noqa: E402
from mediapipe.tasks.python.vision.core.image_processing_options import ImageProcessingOptions  # noqa: E402


def centre_square(width: int, height: int, fraction: float) -> RectF:
    side = min(width, height) * fraction
    left, top = (width - side) / 2 / width, (height - side) / 2 / height
    return RectF(left=left, top=top, right=left + side / width, bottom=top + side / height)


def main() -> int:
    model, fraction, paths = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    options = vision.ImageClassifierOptions(base_options=tasks.BaseOptions(model_asset_path=model), max_results=-1)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for index, path in enumerate(paths):
            image = mp.Image.create_from_file(path)
            roi = ImageProcessingOptions(region_of_interest=centre_square(image.width, image.height, fraction))
            result = classifier.classify(image, roi) if fraction > 0 else classifier.classify(image)
            categories = result.classifications[0].categories
            scores = [0.0] * (max(c.index for c in categories) + 1)
            for category in categories:
                scores[category.index] = float(category.score)
            top = categories[0]
            print(json.dumps({"i": index, "label": top.category_name, "index": top.index, "score": top.score,
                              "scores": scores}), flush=True)  # fmt: skip
    versions = {name: metadata.version(name) for name in ("mediapipe", "numpy")}
    print(json.dumps({"device": {"machine": platform.machine(), "python": platform.python_version(),
                                 "versions": versions}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
