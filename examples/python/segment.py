"""Segment an image with unet-edge's end-to-end ONNX model using only onnxruntime, numpy and Pillow.

usage: python segment.py MODEL_E2E.onnx IMAGE MASK.png
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def main(model_path: str, image_path: str, mask_path: str) -> None:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    image = np.asarray(Image.open(image_path).convert("RGB"))  # H x W x 3 uint8
    (mask,) = session.run(["mask"], {"image": image[None]})  # 1 x H x W uint8 class indices
    Image.fromarray(mask[0]).save(mask_path)
    counts = np.bincount(mask.ravel(), minlength=len(classes))
    print(json.dumps({name: int(count) for name, count in zip(classes, counts)}))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(*sys.argv[1:])
