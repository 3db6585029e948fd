"""unet-edge: train a U-Net segmentation model, export it, prove parity and benchmark it for the edge.

Heavy modules (torch, onnxruntime) are imported by the submodules that need them, so importing
the package itself is cheap.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
