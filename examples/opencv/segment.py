"""Segment an image with unet-edge's float model (model.onnx) in OpenCV's DNN module.

The float model takes normalised NCHW input, so the scaling and normalisation happen here, with the
mean and std that unet-edge wrote into the manifest.json beside the model.
usage: python segment.py MODEL.onnx IMAGE MASK.png
"""

import json
import sys
from pathlib import Path

import cv2
import numpy as np


def main(model_path: str, image_path: str, mask_path: str) -> None:
    manifest = json.loads((Path(model_path).parent / "manifest.json").read_text())
    mean, std = manifest["normalisation"]["mean"], manifest["normalisation"]["std"]
    net = cv2.dnn.readNetFromONNX(model_path)
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)  # H x W x 3 uint8, BGR
    params = cv2.dnn.Image2BlobParams(
        scalefactor=tuple(1 / (255 * s) for s in std),  # blob = scalefactor * (pixel - mean)
        size=(image.shape[1], image.shape[0]),
        mean=tuple(255 * m for m in mean),
        swapRB=True,  # the model wants RGB
        ddepth=cv2.CV_32F,
    )
    net.setInput(cv2.dnn.blobFromImageWithParams(image, params))  # 1 x 3 x H x W float32
    logits = net.forward()  # 1 x K x H x W float32
    mask = logits[0].argmax(0).astype(np.uint8)
    cv2.imwrite(mask_path, mask)
    print(json.dumps({"width": image.shape[1], "height": image.shape[0], "classes": manifest["classes"]}))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(*sys.argv[1:])
