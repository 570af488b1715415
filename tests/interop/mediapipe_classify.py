"""Run inside a separate virtualenv with ``mediapipe`` (numpy 2; never in edgetl's own environment).

    python mediapipe_classify.py MODEL CROP_FRACTION IMAGE...

Classifies each image with MediaPipe Tasks' ImageClassifier, given only the model file (the labels
come from its metadata), on the centred square region edgetl's preprocessing crops, and prints one
JSON list: per image the top category's name, index and score.
"""

import json
import sys

import mediapipe as mp
from mediapipe.tasks import python as tasks
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.components.containers.rect import RectF
from mediapipe.tasks.python.vision.core.image_processing_options import ImageProcessingOptions


def centre_square(width: int, height: int, fraction: float) -> RectF:
    side = min(width, height) * fraction
    left, top = (width - side) / 2 / width, (height - side) / 2 / height
    return RectF(left=left, top=top, right=left + side / width, bottom=top + side / height)


def main() -> int:
    model, fraction, paths = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    options = vision.ImageClassifierOptions(base_options=tasks.BaseOptions(model_asset_path=model), max_results=1)
    rows = []
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for path in paths:
            image = mp.Image.create_from_file(path)
            roi = ImageProcessingOptions(region_of_interest=centre_square(image.width, image.height, fraction))
            top = classifier.classify(image, roi).classifications[0].categories[0]
            rows.append({"label": top.category_name, "index": top.index, "score": top.score})
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
