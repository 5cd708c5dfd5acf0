"""Classify images with model.onnx; needs only onnxruntime, numpy and Pillow.

    python example.py IMAGE [IMAGE ...]    # prints: path, class, calibrated confidence
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
CARD = json.loads((HERE / "model_card.json").read_text(encoding="utf-8"))
INPUT = CARD["input"]


def load(path):
    """RGB (transparency on black, EXIF orientation applied), square resize, normalised, CHW."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image).convert("RGB")
    size = INPUT["image_size"]
    if image.size != (size, size):  # area filter when shrinking, bilinear when enlarging
        shrinking = image.width > size or image.height > size
        image = image.resize((size, size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
    pixels = (np.asarray(image, dtype=np.float32) / 255.0 - INPUT["mean"]) / INPUT["std"]
    return pixels.transpose(2, 0, 1).astype(np.float32)


session = onnxruntime.InferenceSession(str(HERE / CARD["file"]), providers=["CPUExecutionProvider"])
images = np.stack([load(path) for path in sys.argv[1:]])
logits, probabilities, embedding = session.run(None, {INPUT["name"]: images})
for path, row in zip(sys.argv[1:], probabilities):
    best = int(row.argmax())
    print(f"{path}\t{CARD['classes'][best]}\t{row[best]:.4f}")
